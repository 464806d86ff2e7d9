"""mm.encoders: see ../shared/design.md for what lives here."""
