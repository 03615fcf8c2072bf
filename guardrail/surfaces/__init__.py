"""What a person sees: Rich renderables (decide nothing) and the demo."""
