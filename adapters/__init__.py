"""mm.adapters: see ../shared/design.md for what lives here."""
