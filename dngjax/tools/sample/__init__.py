"""The sampling jobs of ``python sample/main.py`` / ``dngjax-sample``: class removal and its reports, the posterior check, calibration, text-to-image; configurations in :mod:`.configs`."""
