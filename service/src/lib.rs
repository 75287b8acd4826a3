//! The chatgate chat service.
