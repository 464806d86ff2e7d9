"""The YAML presets (`mm.configs`): read with `importlib.resources.files("mm.configs")`, installed or editable."""
