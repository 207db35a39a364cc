"""The ground floor every area stands on: files and S3 (``storage``), the artifact store and its fencing, fault-
injection points, the progress contract.
"""
