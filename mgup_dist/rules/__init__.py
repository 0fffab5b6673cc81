"""Per-tensor update math: pure rules over local segments plus whole-tensor requests. Imports no engine."""
