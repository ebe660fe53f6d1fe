"""Network faults driven through toxiproxy (real server or the project's emulator)."""
