from django.dispatch import Signal

# Sent by this process whenever a node's link or executors change, so that
# caches of "who serves what" (the router's) can drop what they hold.
executors_changed = Signal()
