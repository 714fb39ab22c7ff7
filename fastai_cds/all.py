from .losses import *
from .stages import *
from .heads import *
from .views import *
from .export import *
from .callback import *
from .semi import *
from .data import *
