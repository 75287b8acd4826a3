//! The chatgate operator.
