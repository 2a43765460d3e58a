"""The paper's problems: objectives, data generators and closed-form references."""

__all__: list[str] = []
