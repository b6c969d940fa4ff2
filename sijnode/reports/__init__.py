"""Report: the TID 1500 SR, Grad-CAM secondary captures, KOS, and the sender."""
