"""One module per schema revision, oldest first (`v<revision>_<slug>.py`)."""
