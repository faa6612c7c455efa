"""Drop-in acceleration of other libraries' models. Each submodule imports its library on import and says which
extra installs it: ``genfast.integrations.diffusers`` (``pip install "genfast[diffusers]"``)."""
