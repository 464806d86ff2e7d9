"""mm.datasets: see ../shared/design.md for what lives here."""
