"""cropchips: Sentinel-2 + EuroCrops crop-classification chips, distributed over Kafka."""

__version__ = "0.3.0"
