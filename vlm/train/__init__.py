"""Training: pairs and splits (`data`), gradient caching (`gradcache`), the loop (`loop`)."""
