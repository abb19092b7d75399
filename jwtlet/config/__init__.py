"""The configuration: sources (YAML, TOML, environment, --dev defaults), the section reader, the schema."""
