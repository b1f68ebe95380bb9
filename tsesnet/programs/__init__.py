"""End-to-end programs: `tsesnet demo`, `tsesnet science`, `tsesnet model-summary`."""
