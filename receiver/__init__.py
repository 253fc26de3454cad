"""dcmflow receiver (see DESIGN.md)."""
