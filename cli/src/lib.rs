//! The `microagent` command-line tool. So far: where microagent keeps its state and
//! where the project's guest kernel is cached. The workspace lifecycle commands are
//! still to come (issue 8).

pub mod home;
