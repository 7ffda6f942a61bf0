"""jinja2 templates of generated programs."""
