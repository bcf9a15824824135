"""Architecture presets shipped with slimadam-hf (YAML files in this folder)."""
