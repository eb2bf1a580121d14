"""Building an index: the incremental builder, and Ray as another executor of its plan."""
