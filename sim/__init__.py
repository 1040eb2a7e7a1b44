"""The simulated magnet-scrap line: belt, encoder, feed, cameras, virtual PLC, bins.

It talks to the line service only over the same protocols as real hardware.
"""
