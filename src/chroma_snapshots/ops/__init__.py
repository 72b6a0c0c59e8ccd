"""Operations on stores that are not the hot path: prune, verify, sync."""
