"""One module per command: ``run(config) -> result``, no printing; configs in ``repquant.tasks.config``."""
