//! The stages wired together under one memory budget: frames in, event lines out.
