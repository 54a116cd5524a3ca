"""soaplab inside other frameworks' trainers: Hugging Face (``hf``) and timm (``timm``).

Each module imports its framework only when used; ``soaplab.optim`` never imports this package.
Lightning needs nothing here: ``configure_optimizers`` returns any soaplab optimizer (see
docs/integrations.md).
"""
