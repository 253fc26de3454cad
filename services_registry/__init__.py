"""dcmflow services_registry (see DESIGN.md)."""
