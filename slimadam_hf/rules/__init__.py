"""The rule engine: module layouts, roles and rules, YAML presets, the plan, its renderer, the builder."""
