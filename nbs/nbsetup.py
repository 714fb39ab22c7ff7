"""The notebooks' shared setup, imported by a hidden cell at the top of each (`import nbsetup`): warnings of other projects
silenced, fastai's progress shown as a plain table and figures kept small, so the saved outputs are small and readable."""
import warnings
warnings.filterwarnings('ignore', category=FutureWarning, module='torch')  # torch.jit.script, used by fastai at import
warnings.filterwarnings('ignore', message='load_learner` uses', category=UserWarning)  # fastai's, on loading a file we just wrote
import fastprogress.fastprogress as fpp
import matplotlib.pyplot as plt
import matplotlib_inline.backend_inline as mpl_inline

fpp.NO_BAR, fpp.ConsoleProgressBar.fill, plt.rcParams['figure.dpi'] = True, '', 60
mpl_inline.set_matplotlib_formats('png')
