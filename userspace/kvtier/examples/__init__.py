"""Examples of using kvtier from an inference engine (not imported by the package itself)."""
