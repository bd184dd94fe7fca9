/* start.S - entry point: the VMM enters here at CPL 3 in long mode with RSP
 * at the top of RAM. Call guest_main(); power off with its return code. */
	.section .text.start, "ax"
	.globl _start
_start:
	and	$-16, %rsp
	xor	%ebp, %ebp
	call	guest_main
	mov	%eax, %eax
	mov	$0x50c, %dx		/* KEMARI_PORT_EXIT */
	outl	%eax, %dx
1:	jmp	1b			/* the VMM never resumes us after EXIT */
