//! The credential table as the control plane pushes it in: SHA-256 digests of keys, never keys.
