from .test_zoneinfo import *
