"""Foundation helpers every layer may import (files, name listings, RNG state); nothing here imports mrgfast."""
