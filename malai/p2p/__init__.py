"""The peer link: TCP → TLS 1.3 pinned to ed25519 identities, dialed by ID52."""
