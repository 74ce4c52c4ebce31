"""Benchmarks that print figures (`promptintern bench ...`); none of them asserts a timing."""
