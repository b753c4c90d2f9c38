"""Model definitions the metrics need that no installed package provides."""
