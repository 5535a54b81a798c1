package ai.phi3export.sample

import ai.onnxruntime.genai.Generator
import ai.onnxruntime.genai.GeneratorParams
import ai.onnxruntime.genai.Model
import ai.onnxruntime.genai.Tokenizer
import android.app.Activity
import android.os.Bundle
import android.widget.Button
import android.widget.EditText
import android.widget.LinearLayout
import android.widget.TextView
import java.io.File
import kotlinx.coroutines.CoroutineScope
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.Job
import kotlinx.coroutines.launch
import kotlinx.coroutines.withContext

/**
 * Loads a phi3-export android bundle from the app's files dir and streams a reply.
 *
 * The bundle's `onnx/` folder is opened by path: onnxruntime-genai maps model.onnx.data from
 * disk, so the weights never pass through the Java heap as a byte array.
 */
class MainActivity : Activity() {
    private val scope = CoroutineScope(Dispatchers.Main + Job())
    private var model: Model? = null
    private var tokenizer: Tokenizer? = null

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        val prompt = EditText(this).apply { setText("What does the for statement do in Python?") }
        val output = TextView(this)
        val speed = TextView(this)
        val send = Button(this).apply { text = "Generate" }
        setContentView(LinearLayout(this).apply {
            orientation = LinearLayout.VERTICAL
            addView(prompt); addView(send); addView(speed); addView(output)
        })

        // adb push BUNDLE/onnx /data/local/tmp/phi3 ; then copy into filesDir (see README)
        val modelDir = File(filesDir, "phi3/onnx")
        send.setOnClickListener {
            output.text = ""
            scope.launch {
                val loaded = withContext(Dispatchers.IO) { load(modelDir) }
                if (loaded == null) {
                    output.text = "No bundle at $modelDir (it needs genai_config.json, model.onnx, model.onnx.data)"
                    return@launch
                }
                generate(loaded.first, loaded.second, prompt.text.toString(), output, speed)
            }
        }
    }

    private fun load(dir: File): Pair<Model, Tokenizer>? {
        if (!File(dir, "genai_config.json").isFile) return null
        val m = model ?: Model(dir.absolutePath).also { model = it }
        val t = tokenizer ?: Tokenizer(m).also { tokenizer = it }
        return m to t
    }

    private suspend fun generate(model: Model, tokenizer: Tokenizer, prompt: String, output: TextView, speed: TextView) {
        // Phi-3 chat format; the bundle's tokenizer_config.json carries the same template.
        val text = "<|user|>\n$prompt<|end|>\n<|assistant|>\n"
        withContext(Dispatchers.Default) {
            val stream = tokenizer.createStream()
            GeneratorParams(model).use { params ->
                params.setSearchOption("max_length", 512.0)
                Generator(model, params).use { generator ->
                    generator.appendTokenSequences(tokenizer.encode(text))
                    var tokens = 0
                    val start = System.nanoTime()
                    while (!generator.isDone) {
                        generator.generateNextToken()
                        val piece = stream.decode(generator.getLastTokenInSequence(0))
                        tokens++
                        val seconds = (System.nanoTime() - start) / 1e9
                        withContext(Dispatchers.Main) {
                            output.append(piece)
                            speed.text = "%d tokens, %.1f tokens/s".format(tokens, tokens / seconds)
                        }
                    }
                }
            }
        }
    }

    override fun onDestroy() {
        tokenizer?.close()
        model?.close()
        super.onDestroy()
    }
}
