"""tristage data package: sources, buckets, the cache pass and the feature loader."""
