"""The exported student's folder format: its manifest file name and format tag, read and written by both sides."""

MANIFEST = "addsr_student.json"
FORMAT = "addsr-pl-student"
FORMAT_VERSION = 1
