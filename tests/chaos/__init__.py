"""The chaos scenario (issue 8): faults on a seeded schedule, decided by a checker."""
