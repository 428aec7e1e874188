"""clipfold profile: latency and accuracy of every variant and of open_clip eager on this machine, the
table, the Pareto plot, and the record --variant auto reads.
"""
