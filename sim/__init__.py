"""wafer sim: a model of a WSE-style wafer (hardware, placement, timing). Imports nothing from engine."""
