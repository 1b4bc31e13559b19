//! ft's integration tests: one binary, modules per area. Fixtures live in tests/fixtures/
//! (see tests/fixtures/README.md for where each came from).

mod it;
