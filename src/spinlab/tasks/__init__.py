"""Built-in tasks whose data the project generates itself."""
