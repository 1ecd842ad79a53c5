"""Export and serving of registered students (no training code)."""
