"""Registry promotion, export and serving of registered students (no training code)."""
