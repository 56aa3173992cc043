"""medvit's test suite (a package, so `tests.helpers` is ours and not another distribution's top-level `tests`)."""
